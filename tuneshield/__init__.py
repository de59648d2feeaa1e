"""TuneShield: the defense as a library."""
