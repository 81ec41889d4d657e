"""Datamodules: synthetic planted-object shapes (default, no download) and image folders."""
