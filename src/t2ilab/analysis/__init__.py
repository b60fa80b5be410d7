"""Result aggregation and analysis over run directories (results.json)."""
