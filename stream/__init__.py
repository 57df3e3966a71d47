"""zerocf stream side: raw impressions and clicks in, validated normalised events out."""
