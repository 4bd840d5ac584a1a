"""The Merger tab (gradio lives only here): layout, forms, state, handlers, gradio compatibility, the
standalone app and the host interface. Built on features and core; never imports cli."""
