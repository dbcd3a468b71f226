"""ROME (Meng et al., 2022): rank-one editing of one layer, one fact at a time (`rome_main.py`)."""
