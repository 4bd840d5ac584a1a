"""What a user does besides a plain merge: repair, swap, analysis, LoRA bake-in, trials, inspection,
Fermat re-basin, demo models. Built on core; never imports ui or cli."""
