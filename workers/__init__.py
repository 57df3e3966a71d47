"""zerocf workers: the online LMF worker, the periodic ALS worker, the factor store and lookups."""
