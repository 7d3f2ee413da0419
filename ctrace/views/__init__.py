"""Views over model snapshots: top, report, export. They import only ctrace.model and ctrace.abi."""
