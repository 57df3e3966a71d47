"""Evaluation: metrics and splits (:mod:`.metrics`, pure), the holdout and prequential protocols, ``zerocf eval``
and ``zerocf demo``."""
