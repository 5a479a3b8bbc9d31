"""Every file format and file write of the package: atomic outputs (atomic.py), the lazy safetensors
reader and the writers (safetensors.py), PAVE's statistics files (statistics.py), content hashes
(fingerprint.py), SMILE model files (smile.py) and the registry of model formats the model pools'
atomic save consults (formats.py). Importing the package loads nothing."""
