"""URLs of this app."""
urlpatterns: list = []
