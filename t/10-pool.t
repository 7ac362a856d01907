#!/usr/bin/perl

# A pool of keys behind one gateway: clients authenticate with gateway
# tokens, requests spread over keys and orgs, and only the chosen key's
# credential reaches the provider.

use strict;
use warnings;

use lib 't/lib';

use JSON::PP;
use POSIX ();
use Test::More;
use Time::HiRes;

use Ratepool::Test;

my $t = Ratepool::Test->new;

my %KEY = map { $_ => 'sk-ant-mock-' . $_ . '-' . int(rand(1e9)) }
          qw(a1 b1 c1 d1 e1 f1 u1 g1);
my $TOKEN = 'gw-backend-' . int(rand(1e9));
my $OTHER = 'gw-research-' . int(rand(1e9));

# the mock limits each org to 10 requests a minute, as a provider would
my $mock = $t->start_mock(port => 1, config => {
    keys => {
        $KEY{a1} => { org => 'org-a', name => 'a1' },
        $KEY{b1} => { org => 'org-b', name => 'b1' },
        $KEY{c1} => { org => 'org-c', name => 'c1' },
        $KEY{d1} => { org => 'org-d', name => 'd1' },
        $KEY{e1} => { org => 'org-e', name => 'e1' },
        $KEY{f1} => { org => 'org-f', name => 'f1' },
        $KEY{u1} => { org => 'org-u', name => 'u1' },
        $KEY{g1} => { org => 'org-g', name => 'g1' },
    },
    orgs => { (map { ("org-$_" => { rpm => 10 }) } qw(a b c d)),
              'org-u' => { rpm => 1 }, 'org-g' => { rpm => 100 } },
});

$t->write_file('a1.key', "$KEY{a1}\n");

$t->write_config(<<"EOF");
%%TEST_GLOBALS%%

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    ratepool_zone llm:1m;

    upstream limited {
        ratepool zone=llm;
        ratepool_org org-a rpm=10;
        ratepool_org org-b rpm=10;
        ratepool_org org-c rpm=10;
        ratepool_key a1 org=org-a server=127.0.0.1:%%PORT_1%%
                     key_file=%%TESTDIR%%/a1.key;
        ratepool_key b1 org=org-b server=127.0.0.1:%%PORT_1%% key=$KEY{b1};
        ratepool_key c1 org=org-c server=127.0.0.1:%%PORT_1%% key=$KEY{c1};
        keepalive 8;
    }

    # no limits configured: the gateway spreads by requests in flight
    upstream open {
        ratepool zone=llm;
        ratepool_key d1 server=127.0.0.1:%%PORT_1%% key=$KEY{d1};
        ratepool_key e1 server=127.0.0.1:%%PORT_1%% key=$KEY{e1};
        ratepool_key f1 server=127.0.0.1:%%PORT_1%% key=$KEY{f1};
    }

    # org-u is not declared and allows 1 rpm; the gateway learns that
    # from its first answer, and sends it nothing more until then
    upstream probe {
        ratepool zone=llm;
        ratepool_org org-g rpm=100;
        ratepool_key u1 org=org-u server=127.0.0.1:%%PORT_1%% key=$KEY{u1};
        ratepool_key g1 org=org-g server=127.0.0.1:%%PORT_1%% key=$KEY{g1};
    }

    ratepool_workspace backend;
    ratepool_workspace research;
    ratepool_client backend ${\ $t->token_hash($TOKEN)};
    ratepool_client research ${\ $t->token_hash($OTHER)};

    server {
        listen 127.0.0.1:%%PORT_0%%;

        location /v1/ {
            ratepool_pass http://limited;
        }

        location /probe/v1/ {
            rewrite ^/probe(/.*)\$ \$1 break;
            ratepool_pass http://probe;
        }

        location /open/v1/ {
            rewrite ^/open(/.*)\$ \$1 break;
            ratepool_pass http://open;
        }
    }
}
EOF

$t->run;

sub credentials {
    my (%count);
    $count{ $_->{key_name} // 'none' }++ for @{ $mock->log };
    return \%count;
}

# authentication

my $r = $t->messages(token => 'gw-not-a-token');

is($r->{status}, 401, 'an unknown gateway token gets 401');
my $err = eval { decode_json($r->{body}) } || {};
is($err->{type}, 'error', 'the 401 is in the provider\'s error format');
is($err->{error}{type}, 'authentication_error',
    'and says authentication_error');
like($err->{request_id}, qr/^req_gw_[0-9a-f]{32}$/,
    'and carries a request id');
is($r->{headers}{'retry-after'}, undef, 'a 401 has no retry-after');

is($t->messages()->{status}, 401, 'a request without a token gets 401');
is($t->messages(token => '')->{status}, 401, 'an empty token gets 401');
is(scalar @{ $mock->log }, 0, 'rejected clients never reach the provider');

is($t->messages(token => $TOKEN)->{status}, 200,
    'a gateway token in x-api-key is accepted');
is($t->messages(token => $OTHER, bearer => 1)->{status}, 200,
    'a gateway token as Authorization: Bearer is accepted');

# what reaches the provider

$mock->reset;

$r = $t->messages(token => $TOKEN, headers => [
    'Authorization'  => "Bearer $OTHER",
    'anthropic-beta' => 'prompt-caching-2024-07-31,output-128k-2025-02-19',
    'x-claude-code-session-id' => 'session-42',
], body => { max_tokens => 7, system => 'Be brief.' });

is($r->{status}, 200, 'a request with both credentials is answered');

my ($seen) = @{ $mock->log };
ok($seen->{credential} =~ /^sk-ant-mock-/, 'the provider sees a pool key');
isnt($seen->{headers}{'x-api-key'}, $TOKEN,
    'the client\'s x-api-key is not forwarded');
is($seen->{headers}{authorization}, undef,
    'the client\'s Authorization is not forwarded to an anthropic key');
is($seen->{headers}{'anthropic-version'}, '2023-06-01',
    'anthropic-version passes unchanged');
is($seen->{headers}{'anthropic-beta'},
    'prompt-caching-2024-07-31,output-128k-2025-02-19',
    'anthropic-beta passes unchanged');
is($seen->{headers}{'x-claude-code-session-id'}, 'session-42',
    'other client headers pass unchanged');
is($seen->{headers}{'accept-encoding'}, undef,
    'the provider is asked for an uncompressed answer');
is($seen->{headers}{host}, '127.0.0.1:' . $t->port(1),
    'the Host header is the key\'s server');
is(decode_json($seen->{body})->{system}, 'Be brief.',
    'the body reaches the provider unchanged');
is($seen->{method}, 'POST', 'as a POST');

like($r->{headers}{'request-id'}, qr/^req_/,
    'the provider\'s request-id reaches the client');
is($r->{headers}{'anthropic-ratelimit-requests-remaining'}, undef,
    'one org\'s remaining requests are not shown as if they were the pool\'s');
is($r->{headers}{'anthropic-ratelimit-requests-limit'}, undef,
    'nor its limit');
is($r->{headers}{'anthropic-organization-id'}, undef,
    'nor which org answered');


# spreading by headroom: 3 orgs of 10 rpm serve 27 requests, 9 each

$mock->reset;

my $statuses = $t->parallel(9, sub {
    join ',', map { $t->messages(token => $TOKEN)->{status} } 1 .. 3;
});

is(join(',', @$statuses), join(',', ('200,200,200') x 9),
    '27 requests from 9 parallel clients all get 200');

my $count = credentials();
is_deeply([ sort { $a <=> $b } values %$count ], [ 9, 9, 9 ],
    'each of the three orgs served exactly 9 of them');
is(scalar(grep { $_->{status} == 429 } @{ $mock->log }), 0,
    'the provider never answered 429, no org was pushed past its limit');

# past capacity: the pool's 30 rpm are nearly spent, the gateway says so

$r = $t->messages(token => $TOKEN);
$r = $t->messages(token => $TOKEN) for 1 .. 3;

is($r->{status}, 429, 'a pool with no headroom left answers 429');
$err = eval { decode_json($r->{body}) } || {};
is($err->{error}{type}, 'rate_limit_error', 'as a rate_limit_error');
like($r->{headers}{'retry-after'}, qr/^\d+$/, 'with retry-after in seconds');
cmp_ok($r->{headers}{'retry-after'}, '<=', 7,
    'saying when the first org refills (6 s at 10 rpm, plus jitter)');
is($r->{headers}{'x-should-retry'}, 'true', 'and x-should-retry: true');
is(scalar(grep { $_->{status} == 429 } @{ $mock->log }), 0,
    'the gateway did not spend a request on the provider to find out');

# spreading by requests in flight when limits are unknown

$mock->reset;

$statuses = $t->parallel(6, sub {
    $t->messages(token => $TOKEN, path => '/open/v1/messages',
                 headers => [ 'x-mock-delay-ms' => 700 ])->{status};
});

is(join(',', @$statuses), '200,200,200,200,200,200',
    'six slow parallel requests to a pool of unknown limits succeed');
is_deeply([ sort { $a <=> $b } values %{ credentials() } ], [ 2, 2, 2 ],
    'they are spread two per key, none piled on one key');

# an org of unknown limits gets one request until it answers

$mock->reset;

$statuses = $t->parallel(4, sub {
    Time::HiRes::sleep(0.05 * $_[0]);
    $t->messages(token => $TOKEN, path => '/probe/v1/messages',
                 headers => [ 'x-mock-delay-ms' => 500 ])->{status};
});

is(join(',', @$statuses), '200,200,200,200',
    'four slow requests to a pool with an org of unknown limits succeed');
is(credentials()->{u1}, 1, 'the unknown org got one of them');
is(scalar(grep { $_->{status} == 429 } @{ $mock->log }), 0,
    'so its 1 rpm was never exceeded');

# every rate-limit header of either dialect, whichever key answers (last:
# what it teaches the gateway of its org would change the tests above)

my $reset = POSIX::strftime('%Y-%m-%dT%H:%M:%SZ', gmtime(time));
my %limit_of = (requests => 100, tokens => 1e6, 'input-tokens' => 1e6,
                'output-tokens' => 1e6, 'project-tokens' => 1e6);
my @limit_headers = (
    'anthropic-ratelimit-unified-status' => 'allowed',
    'anthropic-ratelimit-unified-5h-utilization' => '0.4',
    'openai-organization' => 'org-x', 'openai-project' => 'proj_x',
    'x-provider-note' => 'kept',
    (map { ("anthropic-ratelimit-$_-limit" => $limit_of{$_},
            "anthropic-ratelimit-$_-remaining" => $limit_of{$_},
            "anthropic-ratelimit-$_-reset" => $reset) }
     qw(requests tokens input-tokens output-tokens)),
    (map { ("x-ratelimit-limit-$_" => $limit_of{$_},
            "x-ratelimit-remaining-$_" => $limit_of{$_},
            "x-ratelimit-reset-$_" => '6s') }
     qw(requests tokens project-tokens)),
);

$mock->script($KEY{$_}, [ { status => 200, headers => { @limit_headers } } ])
    for qw(u1 g1);
$r = $t->messages(token => $TOKEN, path => '/probe/v1/messages');
is($r->{status}, 200, 'an answer carrying every rate-limit header');
is_deeply([ sort grep { /ratelimit/ } keys %{ $r->{headers} } ], [],
    'reaches the client with none of them, "unified" ones included');
is_deeply([ sort grep { /^openai-|organization/ } keys %{ $r->{headers} } ],
    [], 'nor any header that names the org or project that answered');
is($r->{headers}{'x-provider-note'}, 'kept', 'other headers pass');

$t->stop;
$t->check_log;

done_testing;
