"""What a user does besides a plain merge: repair, swap, analysis, LoRA bake-in, live merges into a
loaded model, trials and the X/Y/Z axes, inspection, Fermat re-basin, demo models. Built on core;
never imports ui or cli."""
