"""Pipeline stages: each a function from records to records, with its clients passed in."""
