/*
 * libFuzzer target for the request body scanner: whatever a client
 * sends, it reads the same model, output cap and conversation hashes
 * whole or in pieces, and a model name never outgrows its buffer.  The
 * first byte chooses the piece size and, with the length, the one byte
 * the body is also cut in two at.
 */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ratepool_request.h"


static void
scan(ratepool_request_t *rq, const uint8_t *data, size_t size, size_t piece)
{
    size_t  n;

    ratepool_request_init(rq);

    while (size) {
        n = (piece && piece < size) ? piece : size;
        ratepool_request_feed(rq, data, n);
        data += n;
        size -= n;
    }
}


static int
same(const ratepool_request_t *a, const ratepool_request_t *b)
{
    return a->model_len == b->model_len
           && memcmp(a->model, b->model, a->model_len) == 0
           && a->has_max_tokens == b->has_max_tokens
           && a->max_tokens == b->max_tokens
           && a->stream == b->stream
           && a->stream_options == b->stream_options
           && ratepool_request_whole(a) == ratepool_request_whole(b)
           && a->conv.valid == b->conv.valid
           && a->conv.prefix_hash == b->conv.prefix_hash
           && a->conv.conversation_hash == b->conv.conversation_hash
           && a->conv.has_prefix == b->conv.has_prefix
           && a->conv.cache_control == b->conv.cache_control
           && a->conv.ttl_1h == b->conv.ttl_1h
           && a->conv.last_message_at == b->conv.last_message_at;
}


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    size_t              piece, cut;
    ratepool_request_t  whole, split;

    if (size < 1) {
        return 0;
    }

    piece = data[0] % 17;
    cut = ((size_t) data[0] * 131 + size) % size;
    data++;
    size--;

    scan(&whole, data, size, 0);

    if (whole.model_len > RATEPOOL_MODEL_MAX) {
        abort();
    }

    /* no hashes without a whole body, and the last message is in it */

    if (whole.conv.valid) {
        if (!ratepool_request_whole(&whole)
            || whole.conv.prefix_hash == 0
            || whole.conv.conversation_hash == 0
            || whole.conv.last_message_at >= size
            || memchr("{[\"-0123456789tfn", data[whole.conv.last_message_at],
                      17) == NULL)
        {
            abort();
        }

    } else if (whole.conv.prefix_hash || whole.conv.conversation_hash) {
        abort();
    }

    scan(&split, data, size, piece);

    if (!same(&whole, &split)) {
        abort();
    }

    ratepool_request_init(&split);
    ratepool_request_feed(&split, data, cut);
    ratepool_request_feed(&split, data + cut, size - cut);

    if (!same(&whole, &split)) {
        abort();
    }

    (void) ratepool_model_match(data, size / 2, data + size / 2,
                                size - size / 2);

    return 0;
}
