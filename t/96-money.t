#!/usr/bin/perl

# Money: requests are priced from the usage the provider reports, at the
# list prices of the first ratepool_price pattern their model matches,
# and counted per key, org, workspace, client and priced model; budgets
# in dollars (daily_usd=, monthly_usd=) answer like token budgets: past
# one, a 429 that names it and when it resets; 30 requests at once
# overrun it by one request at most; with Redis, two gateways share it.

use strict;
use warnings;

use lib 't/lib';

use Cwd ();
use JSON::PP;
use List::Util qw(sum);
use Test::More;

use Ratepool::Test;

my $t = Ratepool::Test->new;
my $ROOT = Cwd::getcwd();

my %KEY = map { $_ => "sk-ant-mock-$_-" . Ratepool::Test::random_hex(8) }
          qw(m1 m2);
my %TOKEN = map { $_ => "gw-$_-" . Ratepool::Test::random_hex(8) }
            qw(alice bob burst free);

my $mock = $t->start_mock(port => 1, config => {
    keys => { $KEY{m1} => { org => 'org-m', name => 'm1' },
              $KEY{m2} => { org => 'org-n', name => 'm2' } },
});

$t->write_config(<<"EOF");
%%TEST_GLOBALS%%

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    ratepool_zone llm:1m;

    upstream claude {
        ratepool zone=llm;
        ratepool_org org-m rpm=10000 itpm=10000000 otpm=1000000;
        ratepool_org org-n rpm=10000 itpm=10000000 otpm=1000000;
        ratepool_key m1 org=org-m server=127.0.0.1:%%PORT_1%% key=$KEY{m1};
        ratepool_key m2 org=org-n server=127.0.0.1:%%PORT_1%% key=$KEY{m2};
    }

    # the shipped list prices (dollars per million tokens)
    include $ROOT/conf-examples/prices.conf;

    ratepool_workspace team daily_usd=0.50;
    ratepool_workspace burst monthly_usd=1;
    ratepool_workspace free;
    ratepool_client team ${\ $t->token_hash($TOKEN{alice})} name=alice;
    ratepool_client team ${\ $t->token_hash($TOKEN{bob})} name=bob;
    ratepool_client burst ${\ $t->token_hash($TOKEN{burst})};
    ratepool_client free ${\ $t->token_hash($TOKEN{free})};

    server {
        listen 127.0.0.1:%%PORT_0%%;

        location /v1/ {
            ratepool_pass http://claude;
        }

        location = /ratepool/status {
            ratepool_status;
        }
    }
}
EOF

$t->run;

sub ask {
    my ($who, $model, $usage, %args) = @_;
    return $t->messages(token => $TOKEN{$who},
        body => { model => $model, max_tokens => 100 },
        headers => [ 'x-mock-usage' => encode_json($usage) ], %args);
}

sub ws { Ratepool::Test::by_name($t->status->{workspaces})->{$_[0]} }

sub prom {
    my $r = $t->http(port => $t->port(0),
                     path => '/ratepool/status?format=prometheus');
    return { $r->{body} =~ /^([^#]\S*) (\S+)$/mg };
}

# alice: 10,000 input and 1,000 output tokens of Sonnet, $0.045; then a
# turn with the cache: 2,000 written, 20,000 read, 100 in, 500 out
is(ask(alice => 'claude-sonnet-4-6',
       { input_tokens => 10000, output_tokens => 1000 })->{status}, 200,
    'alice asks Sonnet');
is(ask(alice => 'claude-sonnet-4-6',
       { input_tokens => 100, output_tokens => 500,
         cache_creation_input_tokens => 2000,
         cache_read_input_tokens => 20000 })->{status}, 200,
    'with the prompt cache');
is(ask(bob => 'claude-haiku-4-5',
       { input_tokens => 4000, output_tokens => 2000 })->{status}, 200,
    'bob asks Haiku');
is(ask(bob => 'some-other-model',
       { input_tokens => 4000, output_tokens => 2000 })->{status}, 200,
    'and a model with no price');

my $sonnet1 = 10000 * 3 + 1000 * 15;
my $sonnet2 = 100 * 3 + 500 * 15 + 2000 * 3.75 + 20000 * 0.30;
my $haiku = 4000 * 1 + 2000 * 5;
my $total = ($sonnet1 + $sonnet2 + $haiku) / 1e6;

my $status = $t->status;
my $team = Ratepool::Test::by_name($status->{workspaces})->{team};
is($team->{cost_usd}, sprintf('%.6f', $total) + 0,
    "the workspace spent \$$total at list prices");
is($team->{usd_today}, $team->{cost_usd}, 'all of it today');
is($team->{daily_usd}, 0.5, 'of its $0.50 a day');

my $clients = Ratepool::Test::by_name($status->{clients});
is($clients->{alice}{cost_usd}, ($sonnet1 + $sonnet2) / 1e6,
    'alice spent her two Sonnet turns, the cache at its own prices');
is($clients->{bob}{cost_usd}, $haiku / 1e6,
    'bob his Haiku turn; the unpriced model cost nothing');

my $models = Ratepool::Test::by_name([ map { { %$_, name => $_->{model} } }
                                       @{ $team->{models} } ]);
is($models->{'claude-sonnet-4*'}{cost_usd}, ($sonnet1 + $sonnet2) / 1e6,
    'the workspace\'s Sonnet spending');
is($models->{'claude-sonnet-4*'}{tokens}{cache_read}, 20000,
    'and tokens');
is($models->{'claude-haiku-4-5*'}{tokens}{output}, 2000,
    'and Haiku\'s');

my $keys = $status->{pools}[0]{keys};
is(sprintf('%.6f', sum(map { $_->{cost_usd} } @$keys)),
    sprintf('%.6f', $total), 'the keys\' costs add up to it');
is(sprintf('%.6f', sum(map { $_->{cost_usd} } @{ $status->{pools}[0]{orgs} })),
    sprintf('%.6f', $total), 'and the orgs\'');

my $p = prom();
is($p->{'ratepool_workspace_cost_usd_total{workspace="team"}'} + 0, $total,
    'Prometheus has the workspace\'s dollars');
is($p->{'ratepool_client_cost_usd_total{client="alice",workspace="team"}'}
   + 0, ($sonnet1 + $sonnet2) / 1e6, 'and alice\'s');
is($p->{'ratepool_workspace_model_cost_usd_total{workspace="team",'
        . 'model="claude-haiku-4-5*"}'} + 0, $haiku / 1e6,
    'and by workspace and model');
is($p->{'ratepool_workspace_model_tokens_total{workspace="team",'
        . 'model="claude-sonnet-4*",kind="cache_creation"}'}, 2000,
    'with tokens by model');
is($p->{'ratepool_workspace_budget_usd{workspace="team",period="day"}'} + 0,
    0.5, 'and the budget');
is($p->{'ratepool_workspace_budget_used_usd{workspace="team",'
        . 'period="day"}'} + 0, $total, 'and its use');

# past the budget: $0.50 a day is spent by two large turns
my $big = { input_tokens => 50000, output_tokens => 10000 };    # $0.30
is(ask(alice => 'claude-sonnet-4-6', $big)->{status}, 200,
    'a large turn fits');
is(ask(bob => 'claude-sonnet-4-6', $big)->{status}, 200,
    'so does one more, alone, that overruns it');
my $r = ask(alice => 'claude-sonnet-4-6', $big);
is($r->{status}, 429, 'then the workspace is refused');
my $err = eval { decode_json($r->{body}) } || {};
like($err->{error}{message} // '',
    qr/workspace "team" has used its daily budget of \$0\.50; it resets at \d{4}-\d\d-\d\dT00:00:00Z/,
    'with a message that names the budget and when it resets');
is($err->{error}{type}, 'rate_limit_error', 'as a rate_limit_error');
is(ask(free => 'claude-sonnet-4-6', $big)->{status}, 200,
    'another workspace goes on');

# 30 requests at once: each reserves its prompt and output cap at its
# model's prices; $1 a month is overrun by one request at most
my $each = { model => 'claude-sonnet-4-6', max_tokens => 4000,
             messages => [ { role => 'user', content => 'x' x 8000 } ] };
my $answers = $t->parallel(30, sub {
    my $r = $t->messages(token => $TOKEN{burst}, body => $each,
        headers => [ 'x-mock-delay-ms' => 300,
                     'x-mock-usage' => '{"output_tokens":4000}' ]);
    my $e = eval { decode_json($r->{body}) } || {};
    return [ $r->{status}, $e->{error}{message} // '' ];
});
my $one = (2000 * 3 + 4000 * 15) / 1e6;     # a request: about $0.066
my $burst = ws('burst');
my $ok = grep { $_->[0] == 200 } @$answers;
ok($burst->{usd_this_month} <= 1 + $one + 0.01,
    "30 requests at once spent \$$burst->{usd_this_month} of \$1, "
    . "by one request (\$$one) at most");
ok($burst->{usd_this_month} >= 1 - $one - 0.01,
    "and close to all of it ($ok served)");
is(scalar(grep { $_->[0] == 429 && $_->[1] =~ /budget of \$1\.00/ }
          @$answers), 30 - $ok, 'the others were told of the $1.00 budget');
is($burst->{budget_reserved_usd}, 0, 'nothing is left reserved');

$t->check_log;

# --- two gateways on one Redis share a budget in dollars --------------------

SKIP: {
    skip 'redis-server is not installed: apt-get install redis-server', 12
        unless grep { -x "$_/redis-server" } split /:/, $ENV{PATH};

    my @gw = map { Ratepool::Test->new } 1 .. 2;
    my $redis = $gw[0]->start_redis;
    my $server = '127.0.0.1:' . $redis->port;

    for my $g (@gw) {
        $g->write_config(<<"EOF");
%%TEST_GLOBALS%%

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    ratepool_zone llm:1m redis=$server redis_timeout=200ms;

    upstream claude {
        ratepool zone=llm;
        ratepool_org org-m rpm=10000 itpm=10000000 otpm=1000000;
        ratepool_key m1 org=org-m server=127.0.0.1:${\ $mock->port }
                     key=$KEY{m1};
    }

    include $ROOT/conf-examples/prices.conf;

    ratepool_workspace fleet daily_usd=0.20;
    ratepool_client fleet ${\ $g->token_hash($TOKEN{alice})} name=alice;
    ratepool_workspace rich monthly_usd=5000000;
    ratepool_client rich ${\ $g->token_hash($TOKEN{bob})} name=bob;

    server {
        listen 127.0.0.1:%%PORT_0%%;

        location /v1/ {
            ratepool_pass http://claude;
        }

        location = /ratepool/status {
            ratepool_status;
        }
    }
}
EOF
        $g->run;
    }

    ok(Ratepool::Test::redis_connected(@gw), 'both gateways reach Redis');

    # $0.045 a turn, on one gateway then the other
    my $turn = { input_tokens => 10000, output_tokens => 1000 };
    my @codes;
    for my $i (0 .. 5) {
        my $g = $gw[$i % 2];
        push @codes, $g->messages(token => $TOKEN{alice},
            body => { model => 'claude-sonnet-4-6', max_tokens => 100 },
            headers => [ 'x-mock-usage' => encode_json($turn) ])->{status};
        # the next turn's gateway learns of this one's spending from
        # Redis: the flush of what was used is batched
        select undef, undef, undef, 0.3;
    }
    is(join(',', @codes), '200,200,200,200,200,429',
        'five turns spend $0.225 of $0.20 between them, the sixth is '
        . 'refused');

    my @today = map {
        Ratepool::Test::by_name($_->status->{workspaces})->{fleet}{usd_today}
    } @gw;
    is($today[0], 0.225, 'the first gateway knows the fleet spent $0.225');
    is($today[1], 0.225, 'so does the second');

    sub redis_spent {
        return 0 + ($redis->cli('HGET', 'ratepool:{llm}:w:fleet', 'dc')
                    || 0);
    }

    is(redis_spent(), 225000000, 'Redis holds it, in nano-dollars');
    unlike($redis->cli('KEYS', '*'), qr/gw-|sk-ant/,
        'and no token or key in its key names');

    # Redis restarted empty: the gateways tell it the day's spending again
    $redis->stop;
    $redis->start;
    ok(Ratepool::Test::redis_connected(@gw), 'both gateways reconnect');

    my $deadline = time + 3;
    select undef, undef, undef, 0.1
        while redis_spent() < 225000000 && time < $deadline;
    is(redis_spent(), 225000000, 'and Redis has the day\'s spending back');

    my $r = $gw[1]->messages(token => $TOKEN{alice},
        body => { model => 'claude-sonnet-4-6', max_tokens => 100 });
    is($r->{status}, 429, 'so the budget still holds');
    like($r->{body}, qr/daily budget of \$0\.20/, 'and says which');

    # a fleet that spent a million and a half this month: Redis says so
    # in nano-dollars, a number far larger than any count of tokens
    my @now = gmtime;
    my $month = ($now[5] + 1900) * 12 + $now[4];
    $redis->cli('HSET', 'ratepool:{llm}:w:rich', 'mq', $month,
                'mc', '1500000000000000');
    my $before = store_of($gw[0])->{fallbacks};
    is($gw[0]->messages(token => $TOKEN{bob},
        body => { model => 'claude-sonnet-4-6', max_tokens => 100 })
        ->{status}, 200, 'a workspace that spent $1.5M of $5M is served');
    is(store_of($gw[0])->{fallbacks}, $before,
        'decided by Redis, whose answer was believed');
    ok(Ratepool::Test::by_name($gw[0]->status->{workspaces})->{rich}
       {usd_this_month} >= 1500000, 'and the gateway knows what was spent');

    $_->check_log for @gw;
}

sub store_of { $_[0]->status->{store} }

done_testing;
