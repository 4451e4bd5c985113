"""The synthetic untrimmed-video benchmark (generator.py), the demo that runs the whole
pipeline on it (demo.py), and videos of known frames for the tests, the benchmarks and the GPU
check (videos.py); docs/synth.md describes them."""
