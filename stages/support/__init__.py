"""Building blocks the stage files share: data sources, the tiny VLM, TRL/Ray training glue."""
