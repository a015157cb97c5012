"""One router per resource; handlers parse, call the store inside one transaction, and return a schema."""
