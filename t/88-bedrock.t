#!/usr/bin/perl

# Claude from Amazon Bedrock in the same pool: clients speak Anthropic's
# Messages API to the gateway, and a request may go to Bedrock's Messages
# API instead, at its path, with Bedrock's id for the model (from
# ratepool_model), authenticated by a Bedrock API key or signed with AWS
# credentials (SigV4, over the exact body sent, again on every re-send,
# with a session token for temporary ones).  The mock checks every
# signature by computing it again.  A 429 on Anthropic is served by
# Bedrock, and one on Bedrock by another region, with the client seeing
# one clean 200; a model the configuration does not name for Bedrock
# never goes there; a wrong secret is refused and named, never shown.

use strict;
use warnings;

use lib 't/lib';

use Encode ();
use JSON::PP;
use Test::More;
use Time::HiRes qw(sleep);

use Ratepool::Test;
use Ratepool::Tls;

my $t = Ratepool::Test->new;

# certificates for a TLS front to the mock (Bedrock is reached over TLS)
my $tls = Ratepool::Tls->new($t, mock => 0);

my $rand = \&Ratepool::Test::random_hex;
my $ANTHROPIC = 'sk-ant-mock-a1-' . $rand->(8);
my $BEDROCK_KEY = 'ABSK' . $rand->(24);           # a Bedrock API key
my $AKID = 'AKIA' . uc $rand->(8);
my $SECRET = 'wJalrXUtnFEMI/K7MDENG+' . $rand->(9);
my $TEMP_AKID = 'ASIA' . uc $rand->(8);
my $TEMP_SECRET = 'tEmP/' . $rand->(16);
my $TOKEN = 'IQoJb3JpZ2luX2VjE' . $rand->(40);
my $CLIENT = 'gw-bedrock-' . $rand->(8);
my $BEDROCK_ID = 'us.anthropic.claude-sonnet-4-6-v1:0';

my $mock = $t->start_mock(port => 1, log => 1, config => {
    keys => {
        $ANTHROPIC   => { org => 'anthropic-1', name => 'a1' },
        $BEDROCK_KEY => { org => 'aws-east', name => 'east' },
        $AKID        => { org => 'aws-west', name => 'west' },
        $TEMP_AKID   => { org => 'aws-temp', name => 'temp' },
    },
    bedrock_betas => [ 'interleaved-thinking-2025-05-14' ],
    aws => {
        $AKID      => { secret => $SECRET },
        $TEMP_AKID => { secret => $TEMP_SECRET, token => $TOKEN },
    },
});

$t->write_file('west.aws', <<"EOF");
[default]
aws_access_key_id = $AKID
aws_secret_access_key = $SECRET
EOF
$t->write_file('temp.aws', <<"EOF");
# temporary credentials, from STS
aws_access_key_id=$TEMP_AKID
aws_secret_access_key=$TEMP_SECRET
aws_session_token=$TOKEN
EOF
$t->write_file('wrong.aws', <<"EOF");
aws_access_key_id = $AKID
aws_secret_access_key = not-the-secret
EOF

my $server = 'server=127.0.0.1:%%PORT_1%%';

$t->write_config(<<"EOF");
%%TEST_GLOBALS%%

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    ratepool_zone llm:1m;

    ratepool_model claude-sonnet-4-6 bedrock=$BEDROCK_ID;
    ratepool_model claude-llama bedrock=meta.llama3-70b-instruct-v1:0;
    ratepool_bedrock_betas interleaved-thinking-2025-05-14
                           context-1m-2025-08-07;

    upstream mixed {
        ratepool zone=llm;
        ratepool_key a1 org=anthropic-1 $server key=$ANTHROPIC;
        ratepool_key east provider=bedrock region=us-east-1 org=aws-east
                     $server key=$BEDROCK_KEY fallback=1;
        ratepool_key west provider=bedrock region=us-west-2 org=aws-west
                     $server aws_key_file=%%TESTDIR%%/west.aws fallback=2;
    }

    upstream signed {
        ratepool zone=llm;
        ratepool_key west2 provider=bedrock region=us-west-2 org=aws-west
                     $server aws_key_file=%%TESTDIR%%/west.aws;
    }

    upstream temporary {
        ratepool zone=llm;
        ratepool_key temp provider=bedrock region=eu-west-1 org=aws-temp
                     $server aws_key_file=%%TESTDIR%%/temp.aws;
    }

    upstream invoke {
        ratepool zone=llm;
        ratepool_key inv provider=bedrock-invoke region=us-west-2
                     org=aws-invoke $server aws_key_file=%%TESTDIR%%/west.aws;
    }

    upstream overtls {
        ratepool zone=llm;
        ratepool_key tls1 provider=bedrock-invoke region=us-west-2
                     org=aws-tls server=localhost:%%PORT_2%%
                     aws_key_file=%%TESTDIR%%/west.aws;
    }

    upstream wrong {
        ratepool zone=llm;
        ratepool_key bad provider=bedrock region=us-west-2 org=aws-bad
                     $server aws_key_file=%%TESTDIR%%/wrong.aws;
    }

    ratepool_workspace team;
    ratepool_client team ${\ $t->token_hash($CLIENT)};

    server {
        listen 127.0.0.1:%%PORT_0%%;
        client_body_buffer_size 4k;

        location /v1/ {
            ratepool_pass http://mixed;
        }

        location /signed/ {
            rewrite ^/signed(/.*)\$ \$1 break;
            ratepool_pass http://signed;
        }

        location /temporary/ {
            rewrite ^/temporary(/.*)\$ \$1 break;
            ratepool_pass http://temporary;
        }

        location /waiting/ {
            rewrite ^/waiting(/.*)\$ \$1 break;
            ratepool_pass http://mixed;
            ratepool_wait 10s;
            proxy_read_timeout 3s;
        }

        location /invoke/ {
            rewrite ^/invoke(/.*)\$ \$1 break;
            ratepool_pass http://invoke;
        }

        location /tls/ {
            rewrite ^/tls(/.*)\$ \$1 break;
            ratepool_pass https://overtls
                          ssl_trusted_certificate=%%TESTDIR%%/ca.crt;
        }

        location /wrong/ {
            rewrite ^/wrong(/.*)\$ \$1 break;
            ratepool_pass http://wrong;
        }

        location = /ratepool/status {
            ratepool_status;
        }
    }

    # "Bedrock" over TLS: a front to the mock that keeps the Host the
    # signature covers
    server {
        listen 127.0.0.1:%%PORT_2%% ssl;
        ssl_certificate %%TESTDIR%%/good.crt;
        ssl_certificate_key %%TESTDIR%%/good.key;

        location / {
            proxy_pass http://127.0.0.1:%%PORT_1%%;
            proxy_http_version 1.1;
            proxy_set_header Host \$http_host;
            proxy_set_header X-Seen-TLS "[\$ssl_protocol]";
            proxy_buffering off;
        }
    }
}
EOF

$t->run;

my $USAGE = '{"input_tokens":120,"output_tokens":30}';

sub ask {
    my ($path, %opt) = @_;
    return $t->messages(token => $CLIENT, path => $path,
                        headers => [ 'x-mock-usage' => $USAGE,
                                     @{ $opt{headers} || [] } ],
                        body => { model => 'claude-sonnet-4-6',
                                  %{ $opt{body} || {} } },
                        stream => $opt{stream});
}

sub last_sent { $mock->log->[-1] }

sub sent_body { eval { decode_json(Encode::encode('UTF-8', $_[0]{body})) } || {} }

# --- SigV4 ------------------------------------------------------------------

my $r = ask('/signed/v1/messages');
is($r->{status}, 200, 'a request through a pool of AWS credentials');
my $sent = last_sent();
is($sent->{path}, '/anthropic/v1/messages',
   'went to Bedrock\'s Messages API');
is(sent_body($sent)->{model}, $BEDROCK_ID, 'under Bedrock\'s model id');
like($sent->{headers}{authorization},
     qr{^AWS4-HMAC-SHA256 Credential=\Q$AKID\E/\d{8}/us-west-2/bedrock/aws4_request, SignedHeaders=host;x-amz-date, Signature=[0-9a-f]{64}$},
     'signed with SigV4 for the key\'s region (the mock computed it again)');
ok(!defined $sent->{headers}{'x-api-key'}, 'with no x-api-key');
is(decode_json($r->{body})->{usage}{output_tokens}, 30,
   'the client gets the answer');

my $ws = Ratepool::Test::by_name($t->status->{workspaces})->{team};
is($ws->{tokens}{input}, 120, 'whose usage is counted');

$r = ask('/signed/v1/messages', body => { stream => JSON::PP::true });
is($r->{status}, 200, 'a stream through it');
like($r->{body}, qr/event: message_stop/, 'arrives whole');

# a body larger than client_body_buffer_size, read from its file
my $long = 'a prompt too long for memory ' x 400;
$r = ask('/signed/v1/messages',
         body => { messages => [ { role => 'user', content => $long } ] });
is($r->{status}, 200, 'a large body, written to a file, is signed too');
is(sent_body(last_sent())->{messages}[0]{content}, $long, 'and sent whole');

# temporary credentials sign their session token
$r = ask('/temporary/v1/messages');
is($r->{status}, 200, 'temporary credentials');
like(last_sent()->{headers}{authorization},
     qr{SignedHeaders=host;x-amz-date;x-amz-security-token,},
     'sign their session token');
is(last_sent()->{headers}{'x-amz-security-token'}, $TOKEN, 'and send it');

# a model the configuration names no Bedrock id for never goes there
my $seen = @{ $mock->log };
$r = ask('/signed/v1/messages', body => { model => 'claude-opus-4-8' });
isnt($r->{status}, 200, 'a model Bedrock is not told of: not answered '
     . "there ($r->{status})");
is(scalar @{ $mock->log }, $seen, 'nor sent');

# Bedrock's errors reach the client in Anthropic's shape, with its text
$r = ask('/signed/v1/messages', body => { model => 'claude-llama' });
my $err = eval { decode_json($r->{body}) } || {};
is($r->{status}, 400, 'a model id Bedrock refuses: its 400');
is_deeply([ $err->{type}, $err->{error}{type}, $err->{error}{message} ],
          [ 'error', 'invalid_request_error',
            'The provided model identifier is invalid.' ],
          'as an Anthropic invalid_request_error, with Bedrock\'s text')
    or diag $r->{body};

$mock->script($AKID, [ { status => 429 } ], sticky => 1);
$r = ask('/signed/v1/messages');
$err = eval { decode_json($r->{body}) } || {};
is($r->{status}, 429, 'Bedrock throttling its only key: a 429');
is($err->{error}{type}, 'rate_limit_error', 'a rate_limit_error');
like($r->{headers}{'retry-after'} // '', qr/^\d+$/,
     'with the pool\'s retry-after');
$mock->reset;

# wrong credentials: the provider's 403, the key out, no secret shown
$r = ask('/wrong/v1/messages');
is($r->{status}, 403, 'a wrong secret gets Bedrock\'s 403');
$err = eval { decode_json($r->{body}) } || {};
is($err->{error}{type}, 'permission_error', 'as a permission_error');
like($err->{error}{message}, qr/^The request signature we calculated does not match/,
     'saying why');
my $keys = Ratepool::Test::by_name($t->status->{pools}[5]{keys});
is($keys->{bad}{state}, 'refused', 'and the key is taken out');

# --- InvokeModel --------------------------------------------------------------

(my $escaped = $BEDROCK_ID) =~ s/:/%3A/g;
my $team = sub { Ratepool::Test::by_name($t->status->{workspaces})->{team} };

my $before = $team->()->{tokens};
$r = ask('/invoke/v1/messages');
$sent = last_sent();
is($r->{status}, 200, 'a request through InvokeModel');
is($sent->{path}, "/model/$escaped/invoke",
   'at the model\'s path, its id escaped (and signed escaped again)');
is_deeply([ sent_body($sent)->{anthropic_version},
            exists sent_body($sent)->{model},
            exists sent_body($sent)->{stream} ],
          [ 'bedrock-2023-05-31', '', '' ],
          'with Bedrock\'s version in the body and no model or stream');
is(decode_json($r->{body})->{usage}{output_tokens}, 30, 'answered');

$r = ask('/invoke/v1/messages', body => { stream => JSON::PP::true });
$sent = last_sent();
is($r->{status}, 200, 'a stream through InvokeModel');
is($sent->{path}, "/model/$escaped/invoke-with-response-stream",
   'asked of invoke-with-response-stream');
like($r->{headers}{'content-type'}, qr{^text/event-stream},
     'the client gets SSE, not Amazon\'s event stream');
my @events = $r->{body} =~ /^event: (\S+)$/mg;
is_deeply([ @events[0, 1], @events[-2, -1] ],
          [ qw(message_start content_block_start message_delta
               message_stop) ],
          'event by event, whatever the split of the frames');
like($r->{body}, qr/"text_delta"/, 'with the text');
my $after = $team->()->{tokens};
is_deeply([ $after->{input} - $before->{input},
            $after->{output} - $before->{output} ], [ 240, 60 ],
          'and both answers\' usage is counted');

# the same over TLS, streamed
$r = ask('/tls/v1/messages', body => { stream => JSON::PP::true });
is($r->{status}, 200, 'InvokeModel over TLS, its certificate verified');
like(last_sent()->{headers}{'x-seen-tls'}, qr/^\[TLSv1\.[23]\]$/,
     'reached the provider over TLS, signed for its host and port');
like($r->{body}, qr/event: message_stop/, 'the stream arrives whole');

# the client's beta flags that InvokeModel takes go in its body
$r = ask('/invoke/v1/messages',
         headers => [ 'anthropic-beta' => 'claude-code-20250219, '
                      . 'interleaved-thinking-2025-05-14' ]);
is($r->{status}, 200, 'a request with beta flags through InvokeModel');
is_deeply(sent_body(last_sent())->{anthropic_beta},
          [ 'interleaved-thinking-2025-05-14' ],
          'carries those ratepool_bedrock_betas names as anthropic_beta, '
          . 'not the others (which Bedrock would refuse)');

# an event no client reads is left out of the stream, the rest goes on
$r = ask('/invoke/v1/messages', body => { stream => JSON::PP::true },
         headers => [ 'x-mock-es-metadata' => 1 ]);
like($r->{body}, qr/event: message_start.*event: message_stop/s,
     'an event stream with an event of another type arrives whole');
unlike($r->{body}, qr/metadata/, 'without that event');

$mock->script($AKID, [ { stream_error => 'overloaded_error' } ]);
$r = ask('/invoke/v1/messages', body => { stream => JSON::PP::true });
like($r->{body}, qr/event: error\ndata: \{"type":"error","error":\{"type":"api_error","message":"Overloaded"\}\}/,
     'an exception frame mid-stream is an error event');

# --- one pool, three ways in ------------------------------------------------

$r = ask('/v1/messages');
is(last_sent()->{key_name}, 'a1', 'the pool prefers its Anthropic key');

for my $stream (0, 1) {
    my $how = $stream ? 'a stream' : 'a request';

    # the last 429's cooldown (a second and its jitter) is over
    sleep 2.5 if $stream;
    $mock->script($ANTHROPIC, [ { status => 429, retry_after => '1' } ]);
    $seen = @{ $mock->log };
    $r = ask('/v1/messages', body => { $stream ? (stream => JSON::PP::true)
                                                : () });
    my @tries = @{ $mock->log }[ $seen .. $#{ $mock->log } ];

    is($r->{status}, 200, "$how Anthropic refused with a 429: one clean 200");
    is_deeply([ map { "$_->{key_name} $_->{status}" } @tries ],
              [ 'a1 429', 'east 200' ], 'served by Bedrock, with its API key');
    is($tries[1]{path}, '/anthropic/v1/messages', 'at Bedrock\'s path');
    is($tries[1]{headers}{authorization}, "Bearer $BEDROCK_KEY",
       'as a Bearer token');
    is(sent_body($tries[1])->{model}, $BEDROCK_ID, 'under Bedrock\'s id');
    is_deeply([ @{ sent_body($tries[1]) }{qw(max_tokens messages)} ],
              [ @{ sent_body($tries[0]) }{qw(max_tokens messages)} ],
              'the rest of the body as the client sent it');
    like($r->{body}, $stream ? qr/event: message_stop/ : qr/"usage"/,
         'the client gets the whole answer');
}

# Bedrock throttles one region: the next, re-signed for its own
$mock->script($ANTHROPIC, [ { status => 429, retry_after => '1' } ]);
$mock->script($BEDROCK_KEY, [ { status => 429 } ]);
sleep 2.5;
$seen = @{ $mock->log };
$r = ask('/v1/messages');
my @tries = @{ $mock->log }[ $seen .. $#{ $mock->log } ];
is($r->{status}, 200, 'Anthropic and one Bedrock region throttled: a 200');
is(join(' ', map { "$_->{key_name} $_->{status}" } @tries),
   'a1 429 east 429 west 200', 'from the other region, signed (the mock '
   . 'checked it)');

# every key refuses a waiting request: it waits, and goes again with the
# client's own body and length, whichever service the last try rewrote it
# for
sleep 2.5;
$mock->script($_, [ { status => 429, retry_after => '1' } ])
    for $ANTHROPIC, $BEDROCK_KEY, $AKID;
$seen = @{ $mock->log };
$r = ask('/waiting/v1/messages');
@tries = @{ $mock->log }[ $seen .. $#{ $mock->log } ];
is($r->{status}, 200, 'a request every cloud refused waits, then is '
   . 'answered');
is(join(' ', map { "$_->{key_name} $_->{status}" } @tries),
   'a1 429 east 429 west 429 a1 200', 'by the Anthropic key, once it is '
   . 'free');
is(sent_body($tries[-1])->{model}, 'claude-sonnet-4-6',
   'with the client\'s body, whole, after Bedrock\'s tries');

# --- nothing secret anywhere ------------------------------------------------

my $everything = $t->error_log . $t->access_log
               . $t->http(port => $t->port(0), path => '/ratepool/status')
                   ->{body};
for my $secret ($SECRET, $TEMP_SECRET, $TOKEN, $BEDROCK_KEY) {
    ok(index($everything, $secret) < 0,
       'no AWS secret, session token or Bedrock key in logs or status');
}

$t->stop;
$t->check_log;

done_testing;
