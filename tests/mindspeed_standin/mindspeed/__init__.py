"""Stand-in for MindSpeed's published feature interface (see tests/mindspeed_standin/README.md)."""
