"""dsv4.export"""
