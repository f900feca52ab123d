"""What ``make bench``, ``make bench-gpu`` and ``make quality`` run: measuring harnesses beside
the library (as timm keeps ``benchmark.py`` beside its package), never imported by it."""
