"""Live subscriptions to event streams: WebSocket (`/v1/streams/ws`) and Server-Sent Events.

- `hub.py`: one reader per stream per gateway process fans new events out to every subscription of
  that stream; a subscription starting from a past position catches up on its own reads first and
  joins the live feed without a gap or a duplicate (ids are the offsets, as Centrifugo's recovery).
- `connections.py`: one WebSocket connection: authentication, its subscriptions, a bounded send
  queue (a consumer too slow for it is closed, so memory stays bounded), heartbeats and idle timeout.
- `protocol.py`: the JSON messages, close codes and their parsing (`docs/STREAMING_LIVE.md` documents
  them for client authors).
"""
