"""The producer SDK: what event producers import to send validated clicks and impressions."""

from stream.client.producer import DeliveryFailed, EventProducer, producer_config

__all__ = ["DeliveryFailed", "EventProducer", "producer_config"]
