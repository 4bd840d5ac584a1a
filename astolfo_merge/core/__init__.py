"""The merge pipeline: recipe -> plan -> tasks -> engine (one streaming loop), worker processes and jobs.
Imports methods and io, never features, ui or cli."""
