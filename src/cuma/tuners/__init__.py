"""PEFT tuners of this project, one package each (config.py, layer.py, model.py), registered at ``import cuma``."""
