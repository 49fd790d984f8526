"""Everything that reads or writes image, label and table formats: slides, NGFF metadata, label stores, tables."""
