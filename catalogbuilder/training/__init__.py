"""Training of BossNet-family models (``catalogbuilder train``) and the scripts that build the shipped demo models."""
