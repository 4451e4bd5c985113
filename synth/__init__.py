"""The synthetic untrimmed-video benchmark (generator.py) and the demo that runs the whole
pipeline on it (demo.py); docs/synth.md describes both."""
