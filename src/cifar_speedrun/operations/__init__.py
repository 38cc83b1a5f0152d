"""What every run stands on: files written whole, archives, data sources, run locks, signals."""
