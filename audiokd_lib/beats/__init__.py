"""Real-time beat and downbeat tracking (notebook 09): pieces with exact beats, models, decoding, streaming."""
