"""Evaluation: metrics (Dice, HD95, ASD), evaluate (a model on a split, per case), predict (a saved run
on new images or volumes)."""
