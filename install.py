"""Run by the WebUI's launcher (A1111.md §1.1): installs what AstolfoMerge needs and the WebUI lacks.

Only these; never torch, numpy, gradio or safetensors (the WebUI pins its own, and our checkpoint
reader/writer needs no safetensors package).
"""
import launch

REQUIREMENTS = (  # (distribution or module name, pip requirement)
    ("scipy", "scipy>=1.11"),            # Re-Basin's assignment solver
    ("matplotlib", "matplotlib>=3.7"),   # analysis pictures
)

for name, requirement in REQUIREMENTS:
    if not launch.is_installed(name):
        launch.run_pip(f'install "{requirement}"', f"AstolfoMerge requirement: {requirement}")
