"""The read side: :class:`~workers.serving.lookup.Recommender`, ``zerocf recommend`` (:mod:`.cli`) and
``zerocf serve`` (:mod:`.server`)."""
