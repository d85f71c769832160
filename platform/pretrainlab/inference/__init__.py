"""Loading trained models and running them on images."""
