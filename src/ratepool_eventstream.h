
/*
 * Copyright (C) ratepool authors
 */


#ifndef _RATEPOOL_EVENTSTREAM_H_INCLUDED_
#define _RATEPOOL_EVENTSTREAM_H_INCLUDED_


#include <stddef.h>
#include <stdint.h>


/*
 * Amazon's event stream (application/vnd.amazon.eventstream), as Bedrock's
 * InvokeModelWithResponseStream answers: frames of a 12-byte prelude
 * (total length, headers length, CRC32 of the eight bytes before it),
 * headers, a payload and a CRC32 of all before it, read in pieces split
 * anywhere.  Each whole frame whose CRCs hold is handed over with its
 * ":message-type" (event or exception) and its ":event-type" or
 * ":exception-type"; anything else breaks the stream.
 */

#define RATEPOOL_ES_PRELUDE     12
#define RATEPOOL_ES_FRAME_MAX   (1024 * 1024)   /* Bedrock's are KBs */
#define RATEPOOL_ES_TYPE_MAX    64

#define RATEPOOL_ES_EVENT       1
#define RATEPOOL_ES_EXCEPTION   2


typedef struct {
    unsigned char   *buf;       /* the caller's, of cap bytes */
    size_t           cap;
    size_t           have;      /* of the frame being read */
    size_t           need;      /* its length, once its prelude is read */
    unsigned         broken:1;
} ratepool_eventstream_t;


typedef int (*ratepool_es_handler_pt)(void *data, int kind,
    const unsigned char *type, size_t type_len,
    const unsigned char *payload, size_t len);


void ratepool_es_init(ratepool_eventstream_t *es, unsigned char *buf,
    size_t cap);

/*
 * Reads what came; the handler gets each whole frame.  Returns 0, or -1
 * once the stream is broken (a CRC that does not hold, a frame larger
 * than the buffer, headers that do not parse, a handler's -1).
 */
int ratepool_es_feed(ratepool_eventstream_t *es, const unsigned char *p,
    size_t len, ratepool_es_handler_pt handler, void *data);

uint32_t ratepool_crc32(uint32_t crc, const unsigned char *p, size_t len);


/*
 * One frame as the SSE event an Anthropic client expects: a chunk's
 * payload {"bytes": "<base64 of one event's JSON>"} becomes "event: TYPE\n
 * data: JSON\n\n"; an exception becomes an "error" event with
 * Anthropic's error type and the exception's message.  Returns the
 * length written to out (size bytes), 0 if the frame
 * says nothing a client reads, -1 if it is not what it should be.
 * out has room for len + RATEPOOL_ES_SSE_EXTRA bytes.
 */

#define RATEPOOL_ES_SSE_EXTRA   1024

long ratepool_es_sse(int kind, const unsigned char *type, size_t type_len,
    const unsigned char *payload, size_t len, unsigned char *out,
    size_t size);


#endif /* _RATEPOOL_EVENTSTREAM_H_INCLUDED_ */
