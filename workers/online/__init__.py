"""The online learner: the LMF model's in-process state (:mod:`.model`) and the ``zerocf lmf`` process
(:mod:`.worker`)."""
