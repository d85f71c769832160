"""Analysis tools: plots and tables about models, data and runs."""
