"""Event sources: live BPF probes, recording replay, synthetic scenarios. All yield one stream."""
