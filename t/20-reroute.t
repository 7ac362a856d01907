#!/usr/bin/perl

# What the gateway does with the provider's refusals: a 429 cools the
# key's org for at least its retry-after and the same request goes to
# another key; a 529 passes through; a 401 takes the key out, a 403
# takes it out for a while.

use strict;
use warnings;

use lib 't/lib';

use JSON::PP;
use Test::More;
use Time::HiRes qw(sleep time);

use Ratepool::Test;

my $t = Ratepool::Test->new;

my %KEY = map { $_ => 'sk-ant-mock-' . $_ . '-' . int(rand(1e9)) }
          qw(a1 b1 s1 s2 c1 k1 k2 x1 z1 p1 p2);
my $TOKEN = 'gw-backend-' . int(rand(1e9));

my $mock = $t->start_mock(port => 1, config => {
    keys => {
        $KEY{a1} => { org => 'org-a', name => 'a1' },
        $KEY{b1} => { org => 'org-b', name => 'b1' },
        $KEY{s1} => { org => 'org-s', name => 's1' },
        $KEY{s2} => { org => 'org-s', name => 's2' },
        $KEY{c1} => { org => 'org-c', name => 'c1' },
        $KEY{k1} => { org => 'org-k1', name => 'k1' },
        $KEY{k2} => { org => 'org-k2', name => 'k2' },
        $KEY{z1} => { org => 'org-z', name => 'z1' },
        $KEY{p1} => { org => 'org-p1', name => 'p1' },
        $KEY{p2} => { org => 'org-p2', name => 'p2' },
        $KEY{x1} => { org => 'org-x', name => 'x1' },
    },
});

$t->write_config(<<"EOF");
%%TEST_GLOBALS%%

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    ratepool_zone llm:1m;

    upstream two {
        ratepool zone=llm;
        ratepool_key a1 org=org-a server=127.0.0.1:%%PORT_1%% key=$KEY{a1};
        ratepool_key b1 org=org-b server=127.0.0.1:%%PORT_1%% key=$KEY{b1};
        keepalive 8;
    }

    upstream shared {
        ratepool zone=llm;
        ratepool_key s1 org=org-s server=127.0.0.1:%%PORT_1%% key=$KEY{s1};
        ratepool_key s2 org=org-s server=127.0.0.1:%%PORT_1%% key=$KEY{s2};
        ratepool_key c1 org=org-c server=127.0.0.1:%%PORT_1%% key=$KEY{c1};
    }

    upstream auth {
        ratepool zone=llm;
        ratepool_key k1 org=org-k1 server=127.0.0.1:%%PORT_1%% key=$KEY{k1};
        ratepool_key k2 org=org-k2 server=127.0.0.1:%%PORT_1%% key=$KEY{k2};
    }

    upstream perm {
        ratepool zone=llm;
        ratepool_key p1 org=org-p1 server=127.0.0.1:%%PORT_1%% key=$KEY{p1};
        ratepool_key p2 org=org-p2 server=127.0.0.1:%%PORT_1%% key=$KEY{p2};
    }

    upstream solo {
        ratepool zone=llm;
        ratepool_key z1 org=org-z server=127.0.0.1:%%PORT_1%% key=$KEY{z1};
    }

    upstream broken {
        ratepool zone=llm;
        ratepool_key down org=org-down server=127.0.0.1:%%PORT_2%% key=sk-down;
        ratepool_key x1 org=org-x server=127.0.0.1:%%PORT_1%% key=$KEY{x1};
    }

    ratepool_workspace backend;
    ratepool_client backend ${\ $t->token_hash($TOKEN)};

    server {
        listen 127.0.0.1:%%PORT_0%%;

        location /v1/ {
            ratepool_pass http://two;
        }

        location /shared/v1/ {
            rewrite ^/shared(/.*)\$ \$1 break;
            ratepool_pass http://shared;
        }

        location /auth/v1/ {
            rewrite ^/auth(/.*)\$ \$1 break;
            ratepool_pass http://auth;
        }

        location /perm/v1/ {
            rewrite ^/perm(/.*)\$ \$1 break;
            ratepool_pass http://perm;
        }

        location /solo/v1/ {
            rewrite ^/solo(/.*)\$ \$1 break;
            ratepool_pass http://solo;
        }

        location /broken/v1/ {
            rewrite ^/broken(/.*)\$ \$1 break;
            ratepool_pass http://broken;
        }

        location = /status {
            ratepool_status;
        }
    }
}
EOF

$t->run;

sub key_status {
    my ($name) = @_;
    my $s = $t->status(path => '/status');
    return Ratepool::Test::by_name([ map { @{ $_->{keys} } }
                                     @{ $s->{pools} } ])->{$name} || {};
}

sub names { [ map { $_->{key_name} } @{ $mock->log } ] }

# 429: the same request goes out again with another key

my $body = { max_tokens => 33, messages => [
    { role => 'user', content => "a distinctive prompt \x{2603}" } ] };

$mock->script($KEY{a1}, [ { status => 429, retry_after => '2' } ]);

my $t0 = time;
my $r = $t->messages(token => $TOKEN, body => $body);
my $log = $mock->log;

is($r->{status}, 200, 'a 429 from the provider is hidden from the client');
like(decode_json($r->{body})->{content}[0]{text}, qr/b1/,
    'the answer comes from the second key');
is_deeply(names(), [ 'a1', 'b1' ], 'the provider saw a1, then b1');
is($log->[1]{body}, $log->[0]{body}, 'the same body was sent again');
is($log->[1]{method}, 'POST', 'with the same method');
is($log->[1]{path}, $log->[0]{path}, 'to the same path');
is($log->[1]{headers}{'x-api-key'}, $KEY{b1},
    'under the second key\'s credential');

my $a1 = key_status('a1');
is($a1->{state}, 'cooling', 'the key that got the 429 is cooling down');
cmp_ok($a1->{cooldown_ms}, '>', 1000, 'for about its retry-after');
is($a1->{responses}{429}, 1, 'the 429 is counted');

# retry-after is a floor: a1 is not used before it is over

$mock->reset;
my @early;

while (time - $t0 < 1.9) {
    $t->messages(token => $TOKEN);
    sleep 0.1;
}

is(scalar(grep { $_ eq 'a1' } @{ names() }), 0,
    'a1 gets no request while its retry-after runs');
cmp_ok(scalar @{ names() }, '>=', 10, 'while b1 took the traffic');

sleep 0.2 while time - $t0 < 2.8;   # 2 s retry-after plus at most 500 ms
$mock->reset;
$t->messages(token => $TOKEN) for 1 .. 4;

cmp_ok(scalar(grep { $_ eq 'a1' } @{ names() }), '>=', 1,
    'a1 is back once its retry-after and jitter are over');

# the retry-after may be an HTTP-date

$mock->reset;
my $date = gmtime(time + 30);
my @p = split ' ', $date;
my $http_date = sprintf '%s, %02d %s %s %s GMT', $p[0], $p[2], $p[1], $p[4],
    $p[3];

$mock->script($KEY{a1}, [ { status => 429, retry_after => $http_date } ]);
$t->messages(token => $TOKEN) until @{ names() } && names()->[-1] eq 'a1'
                                    || @{ names() } > 6;
cmp_ok(key_status('a1')->{cooldown_ms}, '>', 25000,
    'an HTTP-date retry-after cools the org until that date');

# every key cooling: the client learns when the first one frees up

$mock->reset;
$mock->script($KEY{b1}, [ { status => 429, retry_after => '5' } ]);

$r = $t->messages(token => $TOKEN);
my $err = eval { decode_json($r->{body}) } || {};

is_deeply(names(), [ 'b1' ], 'the last key with headroom was tried');
is($r->{status}, 429, 'its 429 reaches the client, no key can do better');
is($err->{error}{type}, 'rate_limit_error', 'as a rate_limit_error');
# the cooldown's jitter (up to 0.5 s) and the answer's own (up to a
# tenth of the wait) may add up past a second: 7 at most
ok($r->{headers}{'retry-after'} >= 5 && $r->{headers}{'retry-after'} <= 7,
    'retry-after is the soonest cooldown end (5 s) plus jitter')
    or diag "retry-after: " . ($r->{headers}{'retry-after'} // 'none');
is($r->{headers}{'x-should-retry'}, 'true', 'and the client should retry');

$r = $t->messages(token => $TOKEN);
$err = eval { decode_json($r->{body}) } || {};

is($r->{status}, 429, 'the next request is answered 429 by the gateway');
is($err->{error}{type}, 'rate_limit_error', 'in the provider\'s format');
like($err->{request_id}, qr/^req_gw_/, 'with the gateway\'s request id');
ok($r->{headers}{'retry-after'} >= 4 && $r->{headers}{'retry-after'} <= 6,
    'and retry-after when b1 frees up');
is($r->{headers}{'x-should-retry'}, 'true', 'and x-should-retry: true');
is(scalar @{ names() }, 1, 'without asking the provider');

# a pool of one key: its 429 goes out with the pool's retry-after

$mock->reset;
$mock->script($KEY{z1}, [ { status => 429, retry_after => '30' } ]);

$r = $t->messages(token => $TOKEN, path => '/solo/v1/messages');

is($r->{status}, 429, 'the only key\'s 429 reaches the client');
ok($r->{headers}{'retry-after'} >= 30 && $r->{headers}{'retry-after'} <= 37,
    'with retry-after no earlier than the provider\'s 30 s')
    or diag "retry-after: $r->{headers}{'retry-after'}";

# a provider's several retry-afters: the client gets the pool's alone

sleep 0.2 while key_status('z1')->{state} ne 'ok';
$mock->reset;
$mock->script($KEY{z1}, [ { status => 429, retry_after => '2', headers => {
    'Retry-After' => '600', 'retry-after-ms' => '600000' } } ]);

$r = $t->messages(token => $TOKEN, path => '/solo/v1/messages');
my @ra = $r->{raw_headers} =~ /^retry-after(?:-ms)?:\s*(\S+)/mgi;

is($r->{status}, 429, 'a 429 with three retry-after headers reaches it');
ok(@ra == 1 && $ra[0] >= 2 && $ra[0] <= 60,
   'with one retry-after, the pool\'s, within 1 to 60 s')
    or diag "retry-after headers: @ra";

# a cooldown is never shortened

$mock->reset;
$mock->script($KEY{s1}, [ { status => 429, retry_after => '1',
                            delay_ms => 900 } ]);
$mock->script($KEY{s2}, [ { status => 429, retry_after => '30',
                            delay_ms => 300 } ]);
$mock->script($KEY{c1}, [ { status => 200, delay_ms => 1500 } ]);

my $statuses = $t->parallel(3, sub {
    sleep 0.15 * $_[0];
    $t->messages(token => $TOKEN, path => '/shared/v1/messages')->{status};
});

is(join(',', @$statuses), '200,200,200',
    'three requests on an org that answers 429 twice all succeed');
is_deeply([ sort @{ names() }[0 .. 2] ], [ 'c1', 's1', 's2' ],
    'the first tries went to s1, c1 and s2');
cmp_ok(key_status('s1')->{cooldown_ms}, '>', 25000,
    'a later 429 with a shorter retry-after does not shorten the cooldown');

# 529: overloaded is the provider's state, not the key's

$mock->reset;
sleep 0.2 while key_status('b1')->{state} ne 'ok';

$r = $t->messages(token => $TOKEN, headers => [ 'x-mock-status' => 529 ]);
$err = eval { decode_json($r->{body}) } || {};

is($r->{status}, 529, 'a 529 reaches the client as 529');
is($err->{error}{type}, 'overloaded_error', 'with the provider\'s body');
is(scalar @{ names() }, 1, 'it is not retried on another key');
is(key_status(names()->[0])->{state}, 'ok', 'and the key does not cool down');
is(key_status(names()->[0])->{responses}{529}, 1, 'the 529 is counted');

# 401: the key is taken out of rotation, the request goes on

sub auth { $t->messages(token => $TOKEN, path => '/auth/v1/messages') }

$mock->reset;
$mock->script($KEY{k1}, [ { status => 401 } ], sticky => 1);

my @got = map { auth()->{status} } 1 .. 4;

is(join(',', @got), '200,200,200,200',
    'a key the provider refuses does not fail requests');
is(scalar(grep { $_ eq 'k1' } @{ names() }), 1,
    'the refused key got one request and no more');
is(key_status('k1')->{state}, 'dead', 'the status shows it dead');
is(key_status('k1')->{dead_status}, 401, 'with the status that killed it');
like($t->error_log, qr/key "k1" .* refused with 401, taken out of rotation/,
    'the error log names the key');

# the last key refused: the client is told the pool has no usable key,
# not that its own token is wrong

$mock->script($KEY{k2}, [ { status => 401 } ], sticky => 1);
$r = auth();
$err = eval { decode_json($r->{body}) } || {};

is($r->{status}, 503, 'the last live key\'s 401 becomes a 503');
is($err->{error}{type}, 'api_error', 'an api_error');
like($err->{error}{message}, qr/no key of pool "auth" is accepted/,
    'saying that no key is accepted');
like($err->{request_id}, qr/^req_gw_/, 'answered by the gateway');
unlike($r->{body}, qr/invalid x-api-key/, 'the provider\'s 401 is not shown');
is($r->{headers}{'x-should-retry'}, 'false', 'and retrying is futile');
is(key_status('k2')->{state}, 'dead', 'and that key is out too');

$r = auth();
$err = eval { decode_json($r->{body}) } || {};

is($r->{status}, 503, 'a pool whose keys are all refused answers 503');
like($err->{error}{message}, qr/no key of pool "auth"/, 'saying why');
is($r->{headers}{'x-should-retry'}, 'false', 'and that retrying is futile');
is($r->{headers}{'retry-after'}, undef, 'with no retry-after');

# 403: the key sits out a while (it may lack a permission the request
# needs, or be disabled), the request goes to another key

sub perm { $t->messages(token => $TOKEN, path => '/perm/v1/messages', @_) }

$mock->reset;
$mock->script($KEY{p1}, [ { status => 403 } ], sticky => 1);

@got = map { perm()->{status} } 1 .. 3;

is(join(',', @got), '200,200,200', 'a key refused with 403 fails no request');
is(scalar(grep { $_ eq 'p1' } @{ names() }), 1,
    'it got one request and no more');
is(key_status('p1')->{state}, 'refused', 'the status shows it refused');
cmp_ok(key_status('p1')->{refused_ms}, '>', 250000, 'for five minutes');
like($t->error_log, qr/key "p1" .* refused with 403, out of rotation/,
    'the error log names the key');

$mock->reset;
$r = perm(headers => [ 'x-mock-status' => 403 ]);
$err = eval { decode_json($r->{body}) } || {};

is($r->{status}, 403, 'the last key\'s 403 reaches the client');
is($err->{error}{type}, 'permission_error', 'with the provider\'s body');
is_deeply(names(), [ 'p2' ], 'after one try');

# a key whose server is down: the request goes to another key

$mock->reset;
$r = $t->messages(token => $TOKEN, path => '/broken/v1/messages');

is($r->{status}, 200, 'a key whose server refuses connections is skipped');
is_deeply(names(), [ 'x1' ], 'the request reached the working key');
is(key_status('down')->{responses}{failed}, 1,
    'the failed connection is counted');

$t->stop;
$t->check_log;

done_testing;
