"""What a reader sees: the findings' sentences (`findings`), numbers and column names (`format`),
the figures (`plots`) and the HTML page built from its template (`page`, `templates/`)."""
