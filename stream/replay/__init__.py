"""Dataset replay: dataset readers and the synthetic generator (pure), and ``zerocf produce`` / ``zerocf synth``."""
