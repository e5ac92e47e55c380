"""Research: gin sweeps over methods and budgets (sweep) and the scaling-law fit (scaling)."""
