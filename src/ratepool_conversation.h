
/*
 * Copyright (C) ratepool authors
 */


#ifndef _RATEPOOL_CONVERSATION_H_INCLUDED_
#define _RATEPOOL_CONVERSATION_H_INCLUDED_


#include <stddef.h>
#include <stdint.h>


/*
 * Recognises the conversation a request belongs to by hashing the part
 * of its body that stays the same from turn to turn, as the request
 * scanner passes it the values of the top-level "tools", "system",
 * "messages" and "cache_control", in pieces split anywhere.
 *
 * prefix_hash covers what a prompt cache shares between conversations:
 * "tools" and "system" (Anthropic), and the leading "system" and
 * "developer" messages (OpenAI's Chat Completions).  conversation_hash
 * adds the first "user" message.  Each part is hashed on its own and
 * the parts combined in that fixed order, so the order of the keys in
 * the body does not matter.  The JSON tokens are hashed, not the
 * spacing between them; strings as written, escapes included.
 * "cache_control" members are left out at any depth: clients move their
 * breakpoints from turn to turn.
 *
 * Constant memory, no copies, no recursion.  A body that is not well
 * formed, nests deeper than RATEPOOL_CONV_DEPTH, repeats one of these
 * keys, or has no user message gets no hashes (valid is 0).
 */

#define RATEPOOL_CONV_DEPTH     64      /* containers a value may nest */

/* the top-level values passed */
#define RATEPOOL_CONV_TOOLS     0
#define RATEPOOL_CONV_SYSTEM    1
#define RATEPOOL_CONV_MESSAGES  2
#define RATEPOOL_CONV_CACHE     3       /* the automatic breakpoint */


typedef struct {
    /* results, set by ratepool_conversation_finish() */
    uint64_t         prefix_hash;        /* 0: none */
    uint64_t         conversation_hash;  /* 0: none */
    uint64_t         last_message_at;    /* body offset of the last
                                            element of "messages" */
    uint64_t         prefix_bytes;       /* of "tools" and "system" */
    unsigned         valid:1;
    unsigned         has_prefix:1;       /* tools, system or system
                                            messages were sent */

    /* seen anywhere in these values, valid or not */
    unsigned         cache_control:1;
    unsigned         ttl_1h:1;           /* a "ttl":"1h" breakpoint */

    /* the parts, each an avalanched hash, 0 when absent */
    uint64_t         tools_hash;
    uint64_t         system_hash;
    uint64_t         leading_hash;       /* running, over leading_n */
    uint64_t         first_hash;         /* the first user message */
    unsigned         leading_n;          /* leading system messages */
    unsigned         seen;               /* bit RATEPOOL_CONV_*: passed */
    unsigned         bad:1;
    unsigned         leading:1;          /* no other message yet */
    unsigned         found_user:1;

    /* the value being read */
    unsigned         in_value:1;
    unsigned         hashing:1;          /* this part of it counts */
    unsigned         escape:1;
    unsigned         lax_string:1;
    unsigned         key_long:1;         /* longer than text[] */
    unsigned         text_bad:1;         /* a captured string won't do */
    unsigned         which;              /* RATEPOOL_CONV_* */
    unsigned         state;
    unsigned         depth;              /* containers open in it */
    unsigned         cc_depth;           /* 0, or inside a cache_control
                                            value: its depth + 1 */
    unsigned         key;                /* of the value that comes next */
    unsigned         capture;            /* the string read is this key's */
    unsigned         role;               /* of the message being read */
    uint64_t         objects;            /* bit d: depth d + 1 is an
                                            object, not an array */
    uint64_t         pos;                /* body offset of the next byte */
    uint64_t         hash;               /* of what counts so far */
    unsigned         text_len;
    unsigned char    text[16];           /* a key, or a role or ttl */
} ratepool_conversation_t;


/* FNV-1a, 64 bits, carried on from h; and a finalizer that is never 0 */
#define RATEPOOL_HASH_BASIS     0xcbf29ce484222325ULL

uint64_t ratepool_hash_fnv(uint64_t h, const unsigned char *p, size_t len);
uint64_t ratepool_hash_mix(uint64_t h);

void ratepool_conversation_init(ratepool_conversation_t *cv);

/*
 * A top-level value of one of these keys begins at body offset "at"
 * with the byte c: 1 if it is to be fed from c on until in_value is 0,
 * 0 if it is a number or literal the caller skips itself.
 */
int ratepool_conversation_value(ratepool_conversation_t *cv, unsigned which,
    uint64_t at, unsigned char c);

/* returns the bytes taken: up to the end of the value, or all of them */
size_t ratepool_conversation_feed(ratepool_conversation_t *cv,
    const unsigned char *p, size_t len);

/* the body was one whole JSON object: the hashes are made, if they can */
void ratepool_conversation_finish(ratepool_conversation_t *cv);


#endif /* _RATEPOOL_CONVERSATION_H_INCLUDED_ */
