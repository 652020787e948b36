"""Data: records, readers, the synthetic shapes world and the Lightning datamodule."""
