"""lbp_wht (being written)."""
