"""The read side: :class:`~workers.serving.lookup.Recommender` (recommendations and similar items),
``zerocf recommend`` and ``zerocf similar`` (:mod:`.cli`), ``zerocf serve`` (:mod:`.server`, its query rules in
:mod:`.queries`, its OpenAPI document in :mod:`.openapi`)."""
