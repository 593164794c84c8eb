"""Thin nn.Module layers and blocks over sparse_msda.functional."""
