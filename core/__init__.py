"""The library layer under every other: config, model loading, run directory, Hub, I/O, chat template and the helpers
the stage scripts share. It imports nothing from the rest of the package."""
