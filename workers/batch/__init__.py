"""The periodic re-solve: the click snapshot (:mod:`.interactions`, :mod:`.snapshot`), the ``zerocf als`` process
(:mod:`.worker`) and the optional Spark MLlib backend (:mod:`.spark`)."""
