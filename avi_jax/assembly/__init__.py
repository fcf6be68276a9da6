"""Assembly: a stage family's modules built from a config, and their parameters loaded from Hugging Face
folders, earlier stages or a finished workdir. Used by training and inference alike (it imports neither).
"""
