"""The Global Registry: who exists and where (tenant ids, region allow-lists, home regions).

Other services may import only `registry_service.client` (and the pure models it uses); this
package file imports nothing so that importing the client stays light.
"""
