"""Models shipped with driffusion as package data: ``digits/``, the trained embedded pipeline (a
standard diffusers folder, 5.3 MB) that ``driffusion demo`` and ``driffusion serve`` use by
default. ``driffusion.model_repository.paths.embedded_dir()`` finds it in a checkout and in an
installed wheel alike."""
