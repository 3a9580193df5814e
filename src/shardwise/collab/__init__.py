"""Collaborative inference: a client runs some of the layers, the server the rest."""
